"""`python -m vae_cli COMMAND ...`: the same as the `vae` console script, for an environment whose
scripts folder is not on PATH (or a checkout run without installing)."""

if __name__ == "__main__":
    from vae_cli.cli import console

    console()
