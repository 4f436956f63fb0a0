"""vae-cli: train, probe and measure Variational Autoencoders.

The package is a library first (data, networks, likelihoods, model, estimators, pictures, runs);
`vae_cli.cli` is a thin command line over it. Importing the package imports nothing heavy.
"""

__version__ = "0.1.0"
