//! What can go wrong in the local provider: a model that cannot be loaded is
//! a setup error; a full queue is the caller's signal to back off; anything
//! the engine reports while running is an inference error.

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The model files are missing or unreadable, or the engine refused them.
    #[error("loading {what}: {detail}")]
    Load { what: &'static str, detail: String },
    /// The request cannot be run as asked (too long a prompt, bad parameter).
    #[error("{0}")]
    Invalid(String),
    /// Every worker is busy and the queue is full.
    #[error("the local model is busy; try again shortly")]
    Busy,
    /// The engine failed while running.
    #[error("local inference failed: {0}")]
    Inference(String),
}
