//go:build unix

package cloud

import "syscall"

// nofileLimit is the process's descriptor limit. Go raises the soft limit
// to the hard one at start, so this is what the process may use.
func nofileLimit() (uint64, bool) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, false
	}
	return uint64(rl.Cur), true
}
