"""Assembling a child checkpoint from a solution's block choices and the block library."""

from .assemble import assemble_child, architecture_table

__all__ = ["assemble_child", "architecture_table"]
