"""skumatch flows."""
