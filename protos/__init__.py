"""The wire contract (``reward.proto``) and its generated Python stubs (``make protos``)."""
