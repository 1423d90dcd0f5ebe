"""Studies: experiments of the paper rerun end to end on the shapes world, each with one command."""
