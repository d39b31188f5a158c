"""The objectives: image similarity families (one module each, every loss lower-is-better, with its sign,
range and variant stated), regularizers on the parameter grid, and terms with roles (similarity,
regularizer, supervision) that the engine keeps apart."""
