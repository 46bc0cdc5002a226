"""Real-time delivery: fan-out between API processes, and (later) consultation signaling."""
