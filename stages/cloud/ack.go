package cloud

import "fmt"

// handleAck serves op 23 from a connection that opted in. Stub: the acks
// work replaces its body.
func (s *Stage) handleAck(_ *channel, _ []byte) error {
	return fmt.Errorf("%w: acks not implemented", errProtocol)
}
