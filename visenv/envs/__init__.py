"""The environments: VisGen (and its image/video variants) and the ToolEcho learning check."""
