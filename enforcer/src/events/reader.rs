//! Ring-buffer reader (kernel/ -> events/).
