"""skumatch serving: the BentoML matching service and its build."""
