"""vtl-ha notifier: executables and webhooks called on chosen events, off the failover
path (docs/notifications.md)."""
