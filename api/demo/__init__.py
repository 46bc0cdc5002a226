"""Demo data for Điện Biên, clearly labelled as demo (`is_demo`), for local runs and tests."""
