"""The instance-optimisation machinery: learning-rate schedules, gradient combination rules, the engine."""
