"""The `sage` terminal face: argparse commands that translate options into engine calls, nothing more."""
