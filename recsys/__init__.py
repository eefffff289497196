"""recsys package."""
