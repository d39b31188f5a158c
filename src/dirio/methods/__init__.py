"""What is optimised: transformation models (parameterisations) for the engine."""
