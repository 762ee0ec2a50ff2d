"""`novelcrafter run`: the whole job on one machine, through the real services."""
