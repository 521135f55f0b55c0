"""The web page at `/ui/` and the API's own documentation pages (`/docs`, `/redoc`).

Everything a browser loads is a file in `static/`, served by this process: no CDN, no
request leaves the deployment, so the pages work without internet. Third-party code is a
pinned copy from the npm registry under `static/vendor/` (its README says which and why).
"""
