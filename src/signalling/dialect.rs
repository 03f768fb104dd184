//! Translation between [`super::Signal`] and what Matrix clients and Raiden nodes send (to be written).
