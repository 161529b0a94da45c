"""What a run leaves behind: the report (`report`), the saved folder (`saving`) and the allocation heatmap (`plotting`)."""
