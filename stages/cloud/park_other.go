//go:build !linux

package cloud

import (
	"errors"
	"syscall"
)

// parker is Linux-only; elsewhere every connection keeps its reader.
type parker struct{}

func newParker() (*parker, error) { return nil, errors.New("parking idle connections needs Linux") }

func (p *parker) park(syscall.Conn, uint64, bool, func()) bool { return false }
func (p *parker) wake(uint64)                                  {}
func (p *parker) close()                                       {}
func (p *parker) count() int                                   { return 0 }
