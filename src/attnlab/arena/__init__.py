"""The arena: benchmarks (bench), training (train), leaderboards (leaderboard) and paper claims (claims)."""
