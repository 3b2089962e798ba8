//go:build !unix

package cloud

// nofileLimit is unknown here: cloud.max_conns falls back to
// fallbackMaxConns.
func nofileLimit() (uint64, bool) { return 0, false }
