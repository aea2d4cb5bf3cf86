"""The model: backbones, patch features, coreset, memory bank, PatchCore and its scorer parts,
the fit procedure and the versioned artifact a fitted model is stored as."""
