"""Bridges to other training stacks (diffusers): each imports its library only when used."""
