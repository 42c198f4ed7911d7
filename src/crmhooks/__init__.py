"""crmhooks: Kafka-native workflow-webhook processor for CRM systems."""

__version__ = "0.1.0"
