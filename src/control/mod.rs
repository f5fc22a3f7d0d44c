//! Layer 3, the control plane: from a configuration to ordered map writes.
//! Input files (`input_file`, `config`, `destinations`, `addr`), Maglev
//! tables (`maglev`) and the flow hash's model (`flow_hash`), the apply
//! planner and executor (`apply`), transitions and the sweep's rules
//! (`transition`, `settle`), the running state (`state`), health checks'
//! pure part (`health`: what is probed, up or down, the model without the
//! backends found down). It opens no map itself: it reads and writes
//! through layer 2.

pub mod addr;
pub mod apply;
pub mod config;
pub mod destinations;
pub mod device;
pub mod flow_hash;
pub mod health;
pub mod input_file;
pub mod maglev;
pub mod settle;
pub mod state;
pub mod transition;
