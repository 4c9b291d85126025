"""Korean data: reading sources, checking each record layout, the prompt template and the stages' datasets."""
