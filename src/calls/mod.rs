//! The call broker: a sans-IO state machine per call (to be written).
