"""NSD dataset adapters (raw release, Algonauts 2023, MindEye2), the simulated subject,
splits, z-scoring, repeat averaging and noise ceilings. numpy/h5py/nibabel only: no torch."""
