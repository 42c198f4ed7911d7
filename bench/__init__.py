"""The crmhooks benchmark suite: ceilings, throughput, latency, timers and scale-out."""
