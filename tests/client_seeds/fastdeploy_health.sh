curl -i http://0.0.0.0:8180/health
