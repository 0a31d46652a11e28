"""What several faces share: one definition of every option, and text presentation."""
