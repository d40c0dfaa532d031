"""What a run hands over: the exported model folder, its model card, the HTML report page and its gallery."""
