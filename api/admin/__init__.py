"""`/v1/admin/keys`: API keys made, changed and revoked by the admin key; and each key's
webhook signing secret (`/v1/webhooks/secret`)."""
