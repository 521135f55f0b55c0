curl -X POST "http://0.0.0.0:8180/v1/chat/completions" \
-H "Content-Type: application/json" \
-d '{ "messages": [ {"role": "user", "content": "Rewrite Li Bai's 'Quiet Night Thoughts' as a modern poem"} ] }'
