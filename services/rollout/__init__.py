"""The rollout service as a Ray Serve application (`app.build_app`)."""
