"""What a run writes about itself: report.json as typed records, Markdown reports and plots, the terminal summary."""
