"""What a run writes about itself: Markdown reports and plots."""
