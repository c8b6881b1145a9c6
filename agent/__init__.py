"""gighive-media-agent: mirrors GigHive media to Azure Blob Storage and streams it back."""

__version__ = "0.1.0"
