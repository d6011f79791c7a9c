"""skumatch components."""
