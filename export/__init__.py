"""Assets from trained Gaussians: a mesh (GLB/OBJ) extracted from their opacity field, coloured from
their renders."""
