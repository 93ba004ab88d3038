"""Multi-process execution: context parallelism for the VAE (frames split over ranks)."""
