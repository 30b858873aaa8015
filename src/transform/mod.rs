//! Rows to events: which columns become which traits (`mapping`), and the event shape of
//! docs/architecture.md §5 (`event`). The snapshot, the stream and `preview` all go through this module,
//! so what `preview` prints is exactly what is sent.

pub mod event;
pub mod mapping;

pub use event::{Event, EventKind, Op};
pub use mapping::{MappingError, ProjectedRow, Projection, Traits};
