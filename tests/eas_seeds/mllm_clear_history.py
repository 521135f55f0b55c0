import requests
import json


def post_clear_history(url='http://127.0.0.1:7860', headers=None):
    r = requests.post(f'{url}/clear_history', headers=headers, timeout=1500)
    data = r.content.decode('utf-8')
    return data


if __name__ == '__main__':
    # Replace <service_url> with the service endpoint.
    hosts = '<service_url>'
    # Replace <token> with the service token.
    head = {
        'Authorization': '<token>'
    }

    clear_info = post_clear_history(url=hosts, headers=head)
    print(clear_info)
