"""Grid and field maths shared by every layer: warping, composition, resizing and Jacobians of
displacements in voxels (the one conversion to ``grid_sample`` coordinates), filters, inverse fields,
intensity normalisation, mask filling, level contexts, registries, profiling and process groups."""
