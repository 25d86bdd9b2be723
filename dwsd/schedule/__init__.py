"""The scheduler: triggers (interval, changes, quiet, manual) -> workspace -> retention.
It is the store's single writer; `interface.SchedulerAPI` is what the control server sees."""
