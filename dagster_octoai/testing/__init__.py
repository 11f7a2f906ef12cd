"""Test helpers users can import: the local server and S3 fixtures."""
