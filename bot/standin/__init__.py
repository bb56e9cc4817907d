"""A local stand-in for Slack's Web API: the demo runs against it, and the test suite uses it too."""
