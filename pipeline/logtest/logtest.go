// Package logtest holds what tests need to read a process's logs.
package logtest

import (
	"bytes"
	"sync"
)

// Buffer is a bytes.Buffer that loggers on any goroutine may write to
// while a test reads it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
