"""The IPython face: the magics, the chat panel, and rendering answers safely as HTML."""
