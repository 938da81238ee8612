"""The gateway's API routes, one router per concern; `create_app` includes each with one line."""
